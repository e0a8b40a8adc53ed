//! The three ways the demo builds its application: which pool, and before or after the fork.

/// Which pool the application is built with, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain `r2d2::Pool`, built in the master before the fork (today's broken setup).
    Naive,
    /// `forksafe_pool::Pool`, built in the master before the fork.
    ForkSafe,
    /// uWSGI `--lazy-apps`: every worker builds the whole application after the fork.
    Lazy,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Naive, Mode::ForkSafe, Mode::Lazy];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::ForkSafe => "forksafe",
            Mode::Lazy => "lazy",
        }
    }

    pub fn parse(name: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
            .ok_or_else(|| format!("unknown mode {name:?}"))
    }

    /// Whether the master builds the application before forking.
    pub fn eager(self) -> bool {
        self != Mode::Lazy
    }
}
