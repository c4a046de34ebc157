pub mod pb { tonic::include_proto!("generate.v1"); }
