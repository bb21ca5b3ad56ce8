//! Where a VM goes on the host: its [`Topology`] from the host's sysfs, at admission (the
//! huge page pool) and at each start (with its GPUs' nodes).

use super::QemuBackend;
use crate::backend::BackendError;
use crate::backend::qemu::topology::{self, HostFacts, Topology, TopologyError, VmShape};
use crate::instance::model::Instance;
use crate::instance::spec::Spec;

impl QemuBackend {
    /// Refuses a VM the host's huge page pool cannot hold (reading only). Its GPUs are not
    /// chosen yet, so this is the host-wide pool; the start checks the GPUs' nodes' own pools.
    pub(super) fn check_memory(&self, spec: &Spec) -> Result<(), BackendError> {
        let shape = VmShape { vcpus: spec.cpus, memory_mib: spec.memory_mib, gpu_nodes: vec![] };
        self.place(shape).map(drop)
    }

    /// The instance's topology on its GPUs' nodes.
    pub(super) fn topology(&self, instance: &Instance) -> Result<Topology, BackendError> {
        let sysfs = &self.settings.vfio.sysfs;
        let gpu_nodes = instance
            .gpus
            .iter()
            .map(|g| {
                let addr = g.parse().map_err(|e: crate::vfio::pci::BadPciAddress| {
                    BackendError::Refused { reason: e.to_string() }
                })?;
                topology::host::device_node(sysfs, &addr).map_err(placement_failed)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = &instance.spec;
        self.place(VmShape { vcpus: spec.cpus, memory_mib: spec.memory_mib, gpu_nodes })
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
