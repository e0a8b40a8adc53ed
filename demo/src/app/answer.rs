//! What the answer to request `n` must be, so that the client can tell a right answer from
//! another request's.

use super::database::ROWS;
use super::state::{table_len, table_value};

/// The label row `n` carries.
pub fn expected_label(n: u64) -> String {
    format!("item-{}", n % ROWS + 1)
}

/// The parsed answer of one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub echo: u64,
    pub label: String,
    pub value: u64,
    pub pid: u32,
}

impl Answer {
    pub fn parse(body: &str) -> Option<Answer> {
        let mut echo = None;
        let mut label = None;
        let mut value = None;
        let mut pid = None;
        for field in body.split_whitespace() {
            let (key, val) = field.split_once('=')?;
            match key {
                "n" => echo = val.parse().ok(),
                "label" => label = Some(val.to_owned()),
                "v" => value = val.parse().ok(),
                "pid" => pid = val.parse().ok(),
                _ => return None,
            }
        }
        Some(Answer {
            echo: echo?,
            label: label?,
            value: value?,
            pid: pid?,
        })
    }

    /// Whether this is the answer to request `n` from a server with a `table_mib` table.
    pub fn is_for(&self, n: u64, table_mib: usize) -> bool {
        self.echo == n
            && self.label == expected_label(n)
            && self.value == table_value(n % table_len(table_mib))
    }
}
