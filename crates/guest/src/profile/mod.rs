//! Payload profiles: what runs in the VM (`gatevm.payload=`).

pub mod k3s;
