//! What the benchmarks share.

/// A connection manager whose connections are plain numbers: no I/O at all, so a benchmark
/// measures the pool alone.
#[derive(Clone, Debug, Default)]
pub struct NoIoManager;

impl r2d2::ManageConnection for NoIoManager {
    type Connection = u64;
    type Error = std::io::Error;

    fn connect(&self) -> Result<u64, std::io::Error> {
        Ok(42)
    }

    fn is_valid(&self, _: &mut u64) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u64) -> bool {
        false
    }
}
