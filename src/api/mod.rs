//! HTTP listeners.
