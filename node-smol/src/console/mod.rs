//! The web console: one page at `GET /` on the admin port, embedded in the binary, and the
//! JSON it polls.
//!
//! * [`assets`]: the hand-written HTML, CSS and JavaScript, compiled in with `include_str!`;
//!   served without the token (they hold no data), so the page can ask for it.
//! * [`data`]: `GET /console/data` (overview, rates, latency, storage, cluster) and
//!   `POST /console/lookup` (a record by uuid or user name). Both need the token, like the
//!   rest of the admin API.
//! * [`history`]: the bounded rings behind the charts and the latency percentiles.
//! * [`guard`]: the cross-site, DNS-rebinding and Content-Security-Policy rules that every
//!   admin response follows now that a browser talks to the port.
//!
//! Pushes and record removal use the admin API's own `POST /push` and
//! `POST /clients/{uuid}/clear`; the console adds no second way to change state.

pub(crate) mod assets;
pub(crate) mod data;
pub(crate) mod guard;
pub(crate) mod history;
