//! Models: archives and the registry of loaded versions.

pub mod archive;
pub mod registry;
