//! r2d2's `Error` and `State`, made without r2d2.
//!
//! The pool this crate runs on (`process_pool`) must not run r2d2's code in a forked child, yet
//! returns r2d2's types: r2d2 has no public constructor for either, and the only r2d2 paths
//! that make them park on parking_lot, whose global state a fork leaves corrupted (see
//! `process_pool`). Both rely on r2d2 0.8.10's layout, which is why r2d2 is pinned with `=`.
#![allow(unsafe_code)]

/// An `r2d2::Error` reading "timed out waiting for connection", followed by ": {message}" when
/// there is one, made without r2d2.
pub(crate) fn r2d2_error(message: impl Into<Option<String>>) -> r2d2::Error {
    // SAFETY: r2d2 0.8.10 (pinned with `=` in Cargo.toml) declares `pub struct
    // Error(Option<String>)`, and any `Option<String>` is a valid value of it (r2d2 only formats
    // it). `transmute` checks at compile time that both types have the same size, so the one
    // field sits at offset 0 and covers every byte: the bytes of an `Option<String>` are exactly
    // an `Error`. A unit test checks the result formats as r2d2's own errors do.
    unsafe { std::mem::transmute::<Option<String>, r2d2::Error>(message.into()) }
}

/// An `r2d2::State` with the given counts, made without r2d2.
pub(crate) fn r2d2_state(connections: u32, idle_connections: u32) -> r2d2::State {
    // SAFETY: r2d2 0.8.10's (pinned) `State` is two `u32`s and a private `()`; all-zero bytes are a valid
    // value of each, and r2d2 attaches no meaning to the private field. The public fields are
    // then set by name, so their order in memory does not matter.
    let mut state: r2d2::State = unsafe { std::mem::zeroed() };
    state.connections = connections;
    state.idle_connections = idle_connections;
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2d2_values_made_outside_r2d2() {
        let error = r2d2_error("rebuilt after fork: refused".to_string());
        assert_eq!(
            error.to_string(),
            "timed out waiting for connection: rebuilt after fork: refused"
        );
        assert_eq!(
            r2d2_error(None).to_string(),
            "timed out waiting for connection"
        );
        let state = r2d2_state(3, 2);
        assert_eq!((state.connections, state.idle_connections), (3, 2));
    }
}
