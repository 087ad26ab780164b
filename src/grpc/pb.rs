//! Rust types generated (build.rs) from TorchServe's vendored protos in proto/. The module tree
//! mirrors the proto packages, since prost refers across packages by relative paths.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod org {
    pub mod pytorch {
        pub mod serve {
            pub mod grpc {
                pub mod inference {
                    tonic::include_proto!("org.pytorch.serve.grpc.inference");
                }
                pub mod management {
                    tonic::include_proto!("org.pytorch.serve.grpc.management");
                }
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use org::pytorch::serve::grpc::{inference, management};
