//! `keyway-e2e`: keyway as a whole, the way a platform team would try it before rolling it out.
//! Zones are network namespaces joined by a router namespace; each zone runs two real gateway
//! processes; each workload of `samples/shop` is a pod namespace with the sample app and a real
//! Envoy sidecar running the real keyway filter, its traffic captured by iptables as Istio's init
//! container does. The overlay between zones passes through an impairment relay.

pub mod app;
pub mod cluster;
pub mod credentials;
pub mod datagram;
pub mod demo;
pub mod envoy;
pub mod gateway;
pub mod loopback;
pub mod matrix;
pub mod mesh;
pub mod proc;
pub mod sniff;
pub mod topology;
pub mod wait;
