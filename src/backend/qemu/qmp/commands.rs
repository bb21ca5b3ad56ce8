//! The commands the backend uses, as methods.

use super::{Qmp, QmpError};
use crate::backend::qemu::pin::VcpuThread;

impl Qmp {
    /// `query-status`: the VM's run state (`prelaunch`, `running`, `paused`, …).
    pub async fn query_status(&self) -> Result<qapi_qmp::StatusInfo, QmpError> {
        self.execute(qapi_qmp::query_status {}).await
    }

    /// `cont`: starts or resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute(qapi_qmp::cont {}).await.map(drop)
    }

    /// `query-cpus-fast`: each vCPU's index and host thread id (for pinning).
    pub async fn query_vcpu_threads(&self) -> Result<Vec<VcpuThread>, QmpError> {
        let cpus = self.execute(qapi_qmp::query_cpus_fast {}).await?;
        let decode = |detail: String| QmpError::Decode { command: "query-cpus-fast", detail };
        cpus.iter()
            .map(|cpu| {
                // The reply is a union per target; the fields wanted are in every variant.
                let value = serde_json::to_value(cpu).map_err(|e| decode(e.to_string()))?;
                let field = |name: &str| value[name].as_u64().and_then(|v| u32::try_from(v).ok());
                match (field("cpu-index"), field("thread-id")) {
                    (Some(index), Some(tid)) => Ok(VcpuThread { index, tid }),
                    _ => Err(decode(format!("no cpu-index or thread-id in {value}"))),
                }
            })
            .collect()
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute(qapi_qmp::stop {}).await.map(drop)
    }

    /// `system_reset`: a hard reset of the guest.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute(qapi_qmp::system_reset {}).await.map(drop)
    }

    /// `system_powerdown`: an ACPI power-button press (the guest decides).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute(qapi_qmp::system_powerdown {}).await.map(drop)
    }

    /// `quit`: QEMU exits at once. The reply may be lost to the exit, so a disconnection
    /// counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(qapi_qmp::quit {}).await {
            Ok(_) | Err(QmpError::Disconnected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
