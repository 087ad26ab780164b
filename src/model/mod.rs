//! Models: archives and the registry of loaded versions.

pub mod archive;
pub mod download;
pub mod loading;
pub mod registry;
pub mod snapshot;
