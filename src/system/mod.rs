//! Host and GPU collectors.
