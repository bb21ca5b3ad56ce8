//! The GPUs of a VM: bound to vfio-pci before QEMU starts, released after it is gone.

use std::sync::Arc;

use super::argv::GpuPassthrough;
use crate::backend::BackendError;
use crate::instance::model::Instance;
use crate::vfio::{PciAddress, Vfio, VfioError};

fn addresses(gpus: &[String]) -> Result<Vec<PciAddress>, BackendError> {
    gpus.iter()
        .map(|g| g.parse().map_err(|e: crate::vfio::pci::BadPciAddress| refused(e.to_string())))
        .collect()
}

fn refused(reason: String) -> BackendError {
    BackendError::Refused { reason }
}

/// Whether `gpus` can be passed through now; reads only. A refusal is one sentence.
pub fn check(vfio: &Vfio, gpus: &[String]) -> Result<(), BackendError> {
    if gpus.is_empty() {
        return Ok(());
    }
    vfio.plan(None, &addresses(gpus)?).map(drop).map_err(|e| refused(e.to_string()))
}

/// Binds the instance's GPUs (off the async runtime) and returns what QEMU passes through.
pub async fn bind(
    vfio: &Arc<Vfio>,
    instance: &Instance,
) -> Result<Vec<GpuPassthrough>, BackendError> {
    if instance.gpus.is_empty() {
        return Ok(Vec::new());
    }
    let (id, gpus) = (instance.id.clone(), addresses(&instance.gpus)?);
    let slots = vfio.off_runtime(move |v| v.bind(&id, &gpus)).await.map_err(|e| match e {
        VfioError::Settle { .. }
        | VfioError::Write { .. }
        | VfioError::WriteTimeout { .. }
        | VfioError::Incomplete { .. }
        | VfioError::Record(_)
        | VfioError::RecordCorrupt { .. }
        | VfioError::Sysfs(_) => BackendError::op("bind the GPUs to vfio-pci", e),
        refusal => refused(refusal.to_string()),
    })?;
    Ok(slots
        .into_iter()
        .map(|s| GpuPassthrough {
            functions: s.functions.iter().map(ToString::to_string).collect(),
            bar_bytes: s.bar64_bytes,
        })
        .collect())
}

/// Puts the instance's devices back on their host drivers, verified. Without a bind record
/// (no GPUs, or already released) there is nothing to do.
pub async fn release(vfio: &Arc<Vfio>, id: &str) -> Result<(), BackendError> {
    let owned = id.to_owned();
    let outcomes = vfio
        .off_runtime(move |v| v.release(&owned))
        .await
        .map_err(|e| BackendError::op("release the GPUs", e))?;
    let failed: Vec<String> = outcomes
        .into_iter()
        .filter_map(|o| o.error.map(|e| format!("{}: {e}", o.address)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BackendError::op("release the GPUs", failed.join("; ")))
    }
}
