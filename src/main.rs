//! Command-line entry point: parses arguments and settings, then hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use qudata_agent::config::{self, Config, Scope};
use qudata_agent::recovery::{self, report};
use qudata_agent::{agent, doctor};

#[derive(Parser)]
#[command(name = "qudata-agent", version, about = "Qudata GPU host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: register with the control plane, serve the API, run instances.
    #[command(after_help = config::help_text(&[Scope::Run, Scope::Host]))]
    Run {
        /// No control plane and no frpc: a generated secret, the API on 127.0.0.1.
        #[arg(long)]
        local: bool,
    },
    /// Check that this host can run the agent: KVM, IOMMU, VFIO, GPUs, QEMU, OVMF, frpc, Docker.
    /// Exits 1 when a check fails.
    #[command(after_help = config::help_text(&[Scope::Host]))]
    Doctor {
        /// Print a JSON array of {"check","status","detail","fix"} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Reconcile this host once, without the control plane (what `run` does at start-up):
    /// adopt-or-report each recorded instance, stop QEMUs carrying the agent's marker that no
    /// record claims, remove leaked disks, seeds, sockets, pidfiles and FRP include files,
    /// return GPUs left on vfio-pci. Prints what it found and did; exits 1 if an action
    /// failed. Waits for a running agent to let go of its lock, or refuses.
    #[command(after_help = config::help_text(&[Scope::Host]))]
    Recover {
        /// Only list what would be done; change nothing (runs beside a running agent).
        #[arg(long)]
        dry_run: bool,
        /// Print JSON ({"dry_run", "rows": [{"subject","name","action","why","failed"?}]}).
        #[arg(long)]
        json: bool,
        /// Host maintenance (reboot, upgrade, uninstall): also stop every running instance
        /// (graceful shutdown, then kill after a deadline; GPUs returned; records and disks
        /// kept, in `error` until `start` boots them again) and frpc. Stop the agent first.
        #[arg(long)]
        stop_all: bool,
        /// Seconds to wait for the agent (or another recover) to release the lock.
        #[arg(long, value_name = "SECONDS", default_value_t = recovery::COMMAND_LOCK_WAIT.as_secs())]
        wait: u64,
    },
    /// The GPUs' health: list it, or take a GPU out of quarantine.
    Gpu {
        #[command(subcommand)]
        action: GpuAction,
    },
    /// Test the GPUs while they are on the NVIDIA driver (the installer runs it before moving
    /// them to vfio-pci): facts and memory health from NVML, Xids in the kernel log since boot.
    /// Writes the GPU inventory the agent reads for /init/host and prints one line per GPU.
    /// Exits 1 when a GPU is not fit (the file is still written); 0 on a host with no driver
    /// (an empty inventory).
    #[command(after_help = config::help_text(&[Scope::Host]))]
    Selftest {
        /// Print the inventory (JSON) instead of text.
        #[arg(long)]
        json: bool,
        /// Where to write the inventory [default: $QUDATA_DATA_DIR/gpu-inventory.json].
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum GpuAction {
    /// Each offered GPU: healthy, quarantined (why, since when) or lost.
    #[command(after_help = config::help_text(&[Scope::Host]))]
    Health {
        /// Print JSON ([{"pci","health","reason"?,"since"?}]).
        #[arg(long)]
        json: bool,
    },
    /// Offer a quarantined GPU again, once it has been checked: the functions it kept on
    /// vfio-pci go back to their drivers and the quarantine is lifted (logged).
    #[command(after_help = config::help_text(&[Scope::Host]))]
    ReleaseQuarantine {
        /// The GPU's PCI address, e.g. 0000:65:00.0.
        address: String,
    },
}

/// Exit status for a setting that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn load_config(local: bool) -> Result<Config, ExitCode> {
    Config::load(&config::ProcessEnv, local).map_err(|e| {
        eprintln!("qudata-agent: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("qudata-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Doctor { json } => {
            // Local relaxes only the API key, which doctor does not use; every other setting
            // is still validated, so a bad one exits 2 as it would for `run`.
            let cfg = match load_config(true) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let mut view = doctor::HostView::from_config(&cfg);
            view.accel = runtime().block_on(doctor::decide_accel(&cfg));
            let checks = doctor::run_all(&view);
            if json {
                println!("{}", doctor::render_json(&checks));
            } else {
                print!("{}", doctor::render_text(&checks));
            }
            if doctor::any_failed(&checks) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Command::Gpu { action } => {
            let cfg = match load_config(true) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            agent::logging::init_for_command(cfg.debug);
            let result = match action {
                GpuAction::Health { json } => qudata_agent::gpu::health::health_command(&cfg, json),
                GpuAction::ReleaseQuarantine { address } => {
                    qudata_agent::gpu::health::release_command(&cfg, &address)
                }
            };
            match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("qudata-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Selftest { json, out } => selftest(json, out.as_deref()),
        Command::Recover { dry_run, json, stop_all, wait } => {
            // Like doctor: no control plane, so no API key; every other setting is checked.
            let cfg = match load_config(true) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            agent::logging::init_for_command(cfg.debug);
            let wait = std::time::Duration::from_secs(wait);
            let result = runtime().block_on(async {
                let (events, _) = tokio::sync::mpsc::unbounded_channel();
                let network = agent::backends::network(&cfg);
                let backends = agent::backends::sweepers(&cfg, events, &network).await;
                recovery::command(&cfg, &backends, &network, dry_run, stop_all, wait).await
            });
            let report = match result {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("qudata-agent: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if json {
                println!("{}", report::render_json(&report));
            } else {
                print!("{}", report::render_text(&report));
            }
            if report.failed() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Command::Run { local } => {
            let cfg = match load_config(local) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            // Listed GPUs must exist here: a typo must not start an agent offering nothing.
            let sysfs = qudata_agent::vfio::SysfsRoot::new(&cfg.sysfs_root);
            if let Err(e) = qudata_agent::gpu::pool::offered(&sysfs, cfg.gpu_pci_addrs.as_deref()) {
                eprintln!("qudata-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            agent::logging::init(cfg.debug);
            let result = if local {
                runtime().block_on(agent::run_local(cfg))
            } else {
                runtime().block_on(agent::run(cfg))
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("qudata-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn selftest(json: bool, out: Option<&std::path::Path>) -> ExitCode {
    let cfg = match load_config(true) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    agent::logging::init_for_command(cfg.debug);
    // Listed GPUs are checked as `run` checks them, so a typo is not a silent "not seen".
    let only = match cfg.gpu_pci_addrs.as_deref() {
        None => None,
        Some(list) => {
            let sysfs = qudata_agent::vfio::SysfsRoot::new(&cfg.sysfs_root);
            match qudata_agent::gpu::pool::offered(&sysfs, Some(list)) {
                Ok(offered) => Some(offered),
                Err(e) => {
                    eprintln!("qudata-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    match qudata_agent::gpu::selftest::selftest_command(&cfg, only.as_deref(), json, out) {
        Ok(outcome) => {
            print!("{}", outcome.stdout);
            eprint!("{}", outcome.stderr);
            if outcome.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("qudata-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
