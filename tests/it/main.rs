//! The integration tests: one binary (as Cloud Hypervisor does), so the support code is
//! compiled and linked once rather than once per test file. One module per area; run one
//! with `cargo test --test it <module>::`.
//!
//! Every test shares one process, two at a time (tests/run-all.sh): the private Docker engine
//! (`Engine::shared`), the fake NVML library, the CI guest image and the frpc stand-in are made
//! once per run, and the tunnel tests' log capture is the process's global tracing subscriber.
//! A test keeps what it makes to itself (its own temp dirs, ports, data dir as Docker owner and
//! run dir as QEMU owner) and changes no process-wide state another test could see: no
//! environment variables, no working directory, no signal dispositions.

// tests/support is shared with the benches (`#[path]` there too).
#[path = "../support/mod.rs"]
mod support;

mod api;
mod api_limits;
mod api_schema;
mod boot;
mod cli;
mod control_plane;
mod control_plane_client;
mod control_plane_stats;
mod docker;
mod docker_engine;
mod docker_network;
mod docker_pull;
mod docker_ssh;
mod doctor;
mod faults;
mod go_upgrade;
mod gpu_bind_nvml;
mod gpu_facts;
mod gpu_guest;
mod gpu_health;
mod gpu_pci;
mod guest_image;
mod guest_metrics;
mod guest_ssh;
mod install;
mod install_nspawn;
mod network;
mod production_vm;
mod qemu;
mod qemu_topology;
mod recover;
mod selftest;
mod systemd;
mod tunnel;
mod tunnel_agent;
mod vfio;
mod vfio_agent;
mod vm;
