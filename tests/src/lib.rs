//! wset test guests and end-to-end test helpers.
