//! The wset controller: will subscribe to every agent, keep summary history
//! in sled, and decide overcommit and migrations. It holds no code yet; the
//! crate exists so the workspace layout is final from the start.
