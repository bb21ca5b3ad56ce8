//! Where a VM goes on the host: its [`Topology`] from the host's sysfs and its GPUs' nodes,
//! at admission (the huge page pools) and at each start.

use super::QemuBackend;
use crate::backend::BackendError;
use crate::backend::qemu::topology::{self, HostFacts, Topology, TopologyError, VmShape};
use crate::instance::model::Instance;
use crate::instance::spec::Spec;

impl QemuBackend {
    /// Refuses a VM that the huge page pools of its GPUs' nodes (the host's, without GPUs)
    /// cannot hold. Reads only; the start plans again with what is free then.
    pub(super) fn fits(&self, spec: &Spec, gpus: &[String]) -> Result<(), BackendError> {
        let gpu_nodes = self.gpu_nodes(gpus)?;
        self.place(VmShape { vcpus: spec.cpus, memory_mib: spec.memory_mib, gpu_nodes }).map(drop)
    }

    /// The instance's topology on its GPUs' nodes.
    pub(super) fn topology(&self, instance: &Instance) -> Result<Topology, BackendError> {
        let gpu_nodes = self.gpu_nodes(&instance.gpus)?;
        let spec = &instance.spec;
        self.place(VmShape { vcpus: spec.cpus, memory_mib: spec.memory_mib, gpu_nodes })
    }

    fn gpu_nodes(&self, gpus: &[String]) -> Result<Vec<Option<u32>>, BackendError> {
        let sysfs = &self.settings.vfio.sysfs;
        gpus.iter()
            .map(|g| {
                let addr = g.parse().map_err(|e: crate::vfio::pci::BadPciAddress| {
                    BackendError::Refused { reason: e.to_string() }
                })?;
                topology::host::device_node(sysfs, &addr).map_err(placement_failed)
            })
            .collect()
    }

    fn place(&self, shape: VmShape) -> Result<Topology, BackendError> {
        let facts = HostFacts::read(&self.settings.vfio.sysfs).map_err(placement_failed)?;
        topology::plan(&facts, &self.settings.reserved_cpus, &shape).map_err(|e| match e {
            TopologyError::HugePagesShort { .. } => BackendError::Refused { reason: e.to_string() },
            other => placement_failed(other),
        })
    }
}

fn placement_failed(e: TopologyError) -> BackendError {
    BackendError::op("place the VM on the host's NUMA nodes", e)
}
