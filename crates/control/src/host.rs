//! The [`Host`] trait: what the control server asks of the daemon.
//!
//! roamd implements it; the server turns each route into one call. Every method returns
//! `Result<_, ApiError>`, and the error's [`ErrorCode`](crate::api::ErrorCode) picks the
//! HTTP status, so the daemon decides what is `not_found`, `conflict`, and so on.
//!
//! Growing the trait: a new method is added WITH a default body that answers
//! `unavailable` ("not supported by this roamd"), so existing implementations (and test
//! doubles) keep compiling. Names are validated by the server before they reach the trait
//! ([`validate_name`](crate::api::validate_name)).

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::api::{
    AgentStatus, ApiError, ForcePrimary, HostInfo, MigrateRequest, MigrationResult, PeerAdd,
    PeerInfo, PeerLimit, Progress, ReplicaInfo, VmCreate, VmInfo, VmPeerAdd, Workload,
};

/// The daemon side of the control API.
#[async_trait]
pub trait Host: Send + Sync + 'static {
    /// `GET /v1/host`.
    async fn host_info(&self) -> Result<HostInfo, ApiError>;

    /// `POST /v1/peers`: pin a peer's key. `conflict` if the name is taken with a different
    /// key or address.
    async fn peer_add(&self, req: PeerAdd) -> Result<PeerInfo, ApiError>;

    /// `GET /v1/peers`.
    async fn peer_list(&self) -> Result<Vec<PeerInfo>, ApiError>;

    /// `DELETE /v1/peers/{name}`.
    async fn peer_remove(&self, name: &str) -> Result<(), ApiError>;

    /// `POST /v1/vms`: define a VM and prepare its disk. `conflict` if the name is taken.
    async fn vm_create(&self, req: VmCreate) -> Result<VmInfo, ApiError>;

    /// `GET /v1/vms`.
    async fn vm_list(&self) -> Result<Vec<VmInfo>, ApiError>;

    /// `GET /v1/vms/{name}`.
    async fn vm_show(&self, name: &str) -> Result<VmInfo, ApiError>;

    /// `POST /v1/vms/{name}/start`: returns once QEMU runs (state `running`).
    async fn vm_start(&self, name: &str) -> Result<VmInfo, ApiError>;

    /// `POST /v1/vms/{name}/stop`.
    async fn vm_stop(&self, name: &str) -> Result<VmInfo, ApiError>;

    /// `DELETE /v1/vms/{name}`: forget the VM and delete its disk. `conflict` while it runs.
    async fn vm_delete(&self, name: &str) -> Result<(), ApiError>;

    /// `POST /v1/vms/{name}/migrate`: move a running VM to a peer; returns when it is done.
    ///
    /// - `Err` only for requests refused up front (unknown VM or peer, VM not running, a
    ///   migration already under way). Nothing has changed in that case.
    /// - Once the migration has begun, the answer is `Ok`: a migration that fails later
    ///   returns `Ok(result)` with `outcome: aborted` and `error` set.
    /// - Send a [`Progress`] whenever something changes (the server re-sends the latest
    ///   one whenever 150 ms pass without news, so there is no need to tick). The server always drains
    ///   `progress`, even after the client went away, so `send().await` does not block for
    ///   long; errors from `send` can be ignored.
    /// - The server runs this call on its own task: a client that disconnects does NOT
    ///   cancel the migration.
    async fn migrate(
        &self,
        req: MigrateRequest,
        progress: mpsc::Sender<Progress>,
    ) -> Result<MigrationResult, ApiError>;

    /// `POST /v1/vms/{name}/workload`: set the guest agent's synthetic workload.
    async fn vm_workload(&self, name: &str, w: Workload) -> Result<AgentStatus, ApiError> {
        let _ = (name, w);
        Err(ApiError::unavailable(
            "workloads are not supported by this roamd",
        ))
    }

    /// `GET /v1/vms/{name}/agent`: what the host sees of the guest agent.
    async fn vm_agent(&self, name: &str) -> Result<AgentStatus, ApiError> {
        let _ = name;
        Err(ApiError::unavailable(
            "agent status is not supported by this roamd",
        ))
    }

    /// `POST /v1/vms/{name}/peers`: add a HIP correspondent to a VM (stored with it; a
    /// running endpoint learns it at once). Returns the VM as `vm show` does.
    async fn vm_peer_add(&self, name: &str, req: VmPeerAdd) -> Result<VmInfo, ApiError> {
        let _ = (name, req);
        Err(ApiError::unavailable(
            "adding HIP peers is not supported by this roamd",
        ))
    }

    /// `POST /v1/vms/{name}/replicas/{host}`: keep a background replica of the VM's disk on
    /// peer `host`. Returns at once (state `seeding`); the copy runs in the background.
    async fn replica_add(&self, vm: &str, host: &str) -> Result<ReplicaInfo, ApiError> {
        let _ = (vm, host);
        Err(ApiError::unavailable(
            "replicas are not supported by this roamd",
        ))
    }

    /// `DELETE /v1/vms/{name}/replicas/{host}`: stop replicating and delete the replica.
    async fn replica_remove(&self, vm: &str, host: &str) -> Result<(), ApiError> {
        let _ = (vm, host);
        Err(ApiError::unavailable(
            "replicas are not supported by this roamd",
        ))
    }

    /// `GET /v1/replicas[?vm=NAME]`: the replicas this host keeps up to date.
    async fn replica_list(&self, vm: Option<&str>) -> Result<Vec<ReplicaInfo>, ApiError> {
        let _ = vm;
        Err(ApiError::unavailable(
            "replicas are not supported by this roamd",
        ))
    }

    /// `POST /v1/peers/{name}/limit`: set or clear the peer's rate limit (persisted).
    async fn peer_set_limit(&self, name: &str, req: PeerLimit) -> Result<PeerInfo, ApiError> {
        let _ = (name, req);
        Err(ApiError::unavailable(
            "peer rate limits are not supported by this roamd",
        ))
    }

    /// `POST /v1/vms/{name}/force-primary`: make this host's copy the primary at a
    /// generation above every one known, logged; other copies become stale.
    async fn vm_force_primary(&self, name: &str, req: ForcePrimary) -> Result<VmInfo, ApiError> {
        let _ = (name, req);
        Err(ApiError::unavailable(
            "force-primary is not supported by this roamd",
        ))
    }

    /// `GET /v1/log`: the host's persistent event log (ownership changes, forced actions,
    /// split brains), oldest first, at most the last 1000 events.
    async fn host_log(&self) -> Result<Vec<serde_json::Value>, ApiError> {
        Err(ApiError::unavailable(
            "the log is not available from this roamd",
        ))
    }

    /// `POST /v1/shutdown`: ask the daemon to exit. Answer first, exit after; the server
    /// sends the reply before it stops when the daemon cancels the server's token.
    async fn shutdown(&self) -> Result<(), ApiError>;
}
