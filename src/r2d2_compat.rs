//! r2d2's `Error`, `State` and event values, made without r2d2.
//!
//! The pool this crate runs on (`process_pool`) must not run r2d2's code in a forked child, yet
//! returns r2d2's types and hands r2d2's events to the user's `HandleEvent`: r2d2 has no public
//! constructor for any of them, and the only r2d2 paths that make them park on parking_lot,
//! whose global state a fork leaves corrupted (see `process_pool`). They rely on r2d2 0.8.10's
//! fields, which is why r2d2 is pinned with `=`; the two-field events do not rely on the order
//! the compiler gave those fields, which they learn at run time (see [`event_layout`]).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use r2d2::event::{AcquireEvent, CheckinEvent, CheckoutEvent, ReleaseEvent, TimeoutEvent};

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

/// An `AcquireEvent` for connection `id`.
pub(crate) fn acquire_event(id: u64) -> AcquireEvent {
    // SAFETY: r2d2 0.8.10 (pinned) declares `pub struct AcquireEvent { id: u64 }`. `transmute`
    // checks at compile time that the sizes match, so the one field covers every byte; any
    // `u64` is a valid id. A unit test reads it back through `connection_id()`.
    unsafe { std::mem::transmute::<u64, AcquireEvent>(id) }
}

/// A `TimeoutEvent` for a `get` that waited `timeout`.
pub(crate) fn timeout_event(timeout: Duration) -> TimeoutEvent {
    // SAFETY: r2d2 0.8.10 (pinned) declares `pub struct TimeoutEvent { timeout: Duration }`;
    // the sizes match (checked by `transmute`), so the one field covers every byte, and the
    // value is a valid `Duration`. A unit test reads it back through `timeout()`.
    unsafe { std::mem::transmute::<Duration, TimeoutEvent>(timeout) }
}

/// A `ReleaseEvent` (connection `id`, closed at `age`); `None` if the layout could not be
/// learned (see [`event_layout`]).
pub(crate) fn release_event(id: u64, age: Duration) -> Option<ReleaseEvent> {
    static LAYOUT: AtomicU32 = AtomicU32::new(UNKNOWN);
    two_field_event(
        &LAYOUT,
        id,
        age,
        ReleaseEvent::connection_id,
        ReleaseEvent::age,
    )
}

/// A `CheckoutEvent` (connection `id`, after a wait of `duration`); `None` if the layout could
/// not be learned.
pub(crate) fn checkout_event(id: u64, duration: Duration) -> Option<CheckoutEvent> {
    static LAYOUT: AtomicU32 = AtomicU32::new(UNKNOWN);
    two_field_event(
        &LAYOUT,
        id,
        duration,
        CheckoutEvent::connection_id,
        CheckoutEvent::duration,
    )
}

/// A `CheckinEvent` (connection `id`, checked out for `duration`); `None` if the layout could
/// not be learned.
pub(crate) fn checkin_event(id: u64, duration: Duration) -> Option<CheckinEvent> {
    static LAYOUT: AtomicU32 = AtomicU32::new(UNKNOWN);
    two_field_event(
        &LAYOUT,
        id,
        duration,
        CheckinEvent::connection_id,
        CheckinEvent::duration,
    )
}

/// Not learned yet in this process.
const UNKNOWN: u32 = 0;
/// Learned, and not a unique assignment: such events are not made.
const INCONSISTENT: u32 = u32::MAX;

/// Where a two-field event `{ id: u64, <duration>: Duration }` keeps its values, as 4-byte
/// groups of its 24 bytes: the pair of groups of the id, the pair of the seconds, the group of
/// the nanoseconds (the sixth is padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    id: usize,
    secs: usize,
    nanos: usize,
}

impl Layout {
    fn encode(self) -> u32 {
        1 | (self.id as u32) << 8 | (self.secs as u32) << 16 | (self.nanos as u32) << 24
    }

    fn decode(code: u32) -> Layout {
        Layout {
            id: (code >> 8 & 0xff) as usize,
            secs: (code >> 16 & 0xff) as usize,
            nanos: (code >> 24 & 0xff) as usize,
        }
    }
}

/// The groups of a probe: distinct, and each below 10⁹, so that any group the compiler made
/// the nanoseconds of the `Duration` holds a valid value, whatever the field order.
const PROBE: [u32; 6] = [1, 2, 3, 4, 5, 6];

/// The 8 bytes of groups `first` and `first + 1` as a `u64`, in native byte order (how the
/// event's field would read them).
fn pair(groups: &[u32; 6], first: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&groups[first].to_ne_bytes());
    bytes[4..].copy_from_slice(&groups[first + 1].to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// Learns where an event type `E` of r2d2's two-field shape keeps its values, from r2d2's own
/// getters: a probe whose six 4-byte groups are distinct small numbers is a valid `E` under
/// every field order the compiler may choose (an id or the seconds take any 8 bytes, the
/// nanoseconds any value below 10⁹, padding anything), so it can be made and read. The id read
/// back names the two groups holding it, the seconds theirs, the nanoseconds its group. `None`
/// unless that is one assignment of distinct, 8-byte aligned pairs and a third group — which
/// every layout of `{ u64, Duration }` on a 64-bit target is.
fn event_layout<E>(id_of: fn(&E) -> u64, duration_of: fn(&E) -> Duration) -> Option<Layout> {
    if std::mem::size_of::<E>() != 24 || std::mem::size_of::<Duration>() != 16 {
        return None;
    }
    // SAFETY: `E` is 24 bytes (checked just above; `transmute_copy` reads `size_of::<E>()`
    // bytes of the 24-byte probe) and, by r2d2 0.8.10's declaration, made of a `u64` and a
    // `Duration` (a `u64` and a `u32` below 10⁹) plus padding. Whatever their order, each byte
    // of the probe falls into a `u64` (any value valid), the `u32` of the nanoseconds (every
    // 4-byte aligned group of the probe is below 10⁹, so valid), or padding. `transmute_copy`
    // reads unaligned, so the probe's alignment of 4 does not matter. The events have no
    // `Drop`, so the copy is simply discarded.
    let probe: E = unsafe { std::mem::transmute_copy::<[u32; 6], E>(&PROBE) };
    let (id, duration) = (id_of(&probe), duration_of(&probe));
    let find_pair = |value: u64| {
        (0..6)
            .step_by(2)
            .find(|&first| pair(&PROBE, first) == value)
    };
    let layout = Layout {
        id: find_pair(id)?,
        secs: find_pair(duration.as_secs())?,
        nanos: PROBE
            .iter()
            .position(|&group| group == duration.subsec_nanos())?,
    };
    let distinct = layout.id != layout.secs
        && layout.nanos / 2 != layout.id / 2
        && layout.nanos / 2 != layout.secs / 2;
    distinct.then_some(layout)
}

/// Makes a two-field event with the layout learned once per process (published with a
/// compare-and-swap, not a `Once` a fork could freeze; a race only computes it twice), and
/// checks the result through the getters; `None`, with one warning per process and event
/// type, when the layout cannot be learned.
fn two_field_event<E>(
    learned: &AtomicU32,
    id: u64,
    duration: Duration,
    id_of: fn(&E) -> u64,
    duration_of: fn(&E) -> Duration,
) -> Option<E> {
    let code = match learned.load(Ordering::Relaxed) {
        UNKNOWN => {
            let code = event_layout(id_of, duration_of).map_or(INCONSISTENT, Layout::encode);
            if learned
                .compare_exchange(UNKNOWN, code, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
                && code == INCONSISTENT
            {
                tracing::warn!(
                    event = std::any::type_name::<E>(),
                    "forksafe-pool: r2d2's event layout is not the expected one; this event \
                     is not reported in forked processes"
                );
            }
            code
        }
        code => code,
    };
    if code == INCONSISTENT {
        return None;
    }
    let layout = Layout::decode(code);
    let mut groups = [0u32; 6];
    let place = |groups: &mut [u32; 6], first: usize, value: u64| {
        let bytes = value.to_ne_bytes();
        groups[first] = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        groups[first + 1] = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    };
    place(&mut groups, layout.id, id);
    place(&mut groups, layout.secs, duration.as_secs());
    groups[layout.nanos] = duration.subsec_nanos();
    // SAFETY: as for the probe in `event_layout` (24 bytes, checked there before this layout
    // was published): the id's and the seconds' groups hold `u64`s, the nanoseconds' group a
    // value below 10⁹ (`subsec_nanos`), and the remaining group is padding, set to 0; so under
    // the layout the getters revealed this is a valid `E`.
    let event: E = unsafe { std::mem::transmute_copy::<[u32; 6], E>(&groups) };
    // Checked, not assumed: the getters read back what was put in.
    (id_of(&event) == id && duration_of(&event) == duration).then_some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2d2_events_made_outside_r2d2() {
        assert_eq!(acquire_event(u64::MAX - 7).connection_id(), u64::MAX - 7);
        let long = Duration::new(u64::MAX - 3, 999_999_999);
        assert_eq!(timeout_event(long).timeout(), long);
        for (id, duration) in [
            (0, Duration::ZERO),
            (u64::MAX, long),
            (42, Duration::new(3, 7)),
        ] {
            let release = release_event(id, duration).expect("release layout");
            assert_eq!((release.connection_id(), release.age()), (id, duration));
            let checkout = checkout_event(id, duration).expect("checkout layout");
            assert_eq!(
                (checkout.connection_id(), checkout.duration()),
                (id, duration)
            );
            let checkin = checkin_event(id, duration).expect("checkin layout");
            assert_eq!(
                (checkin.connection_id(), checkin.duration()),
                (id, duration)
            );
        }
    }

    #[test]
    fn the_probe_finds_a_unique_layout() {
        let layout = event_layout(CheckinEvent::connection_id, CheckinEvent::duration)
            .expect("a unique layout");
        assert_eq!(Layout::decode(layout.encode()), layout);
    }

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
