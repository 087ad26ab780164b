//! Worker pools.
