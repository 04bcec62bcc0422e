//! `keyway-bench`: the bed, the load generator, the measurements, the report and the plots of
//! keyway's side-by-side data-path benchmarks (issue #7). The `keyway-bench` binary drives them.

pub mod bed;
pub mod carriage;
pub mod envoycfg;
pub mod load;
pub mod measure;
pub mod plot;
pub mod report;
pub mod udp;
