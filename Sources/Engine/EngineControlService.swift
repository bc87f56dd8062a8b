import ControlAPI
import GRPCCore
import Synchronization

/// The engine's side of the control API.
public struct EngineControlService: Keel_Control_V1_EngineControl.SimpleServiceProtocol {
    let device: EngineDevice

    public init(device: EngineDevice) { self.device = device }

    public func status(request: Keel_Control_V1_EngineStatusRequest,
                       context: ServerContext) async throws -> Keel_Control_V1_EngineStatus {
        var status = Keel_Control_V1_EngineStatus()
        status.volume = device.volume
        status.size = device.size
        status.epoch = device.epoch
        switch device.replicas.health {
        case .healthy: status.health = .ok
        case .degraded: status.health = .degraded
        case .faulted: status.health = .faulted
        }
        status.replicas = device.replicas.states.map { state in
            var replica = Keel_Control_V1_ReplicaState()
            replica.address = "\(state.address)"
            replica.mode = state.mode.rawValue
            replica.epoch = device.epoch
            replica.error = state.reason
            return replica
        }
        let counters = device.counters
        status.io = .with {
            $0.reads = counters.reads.load(ordering: .relaxed)
            $0.writes = counters.writes.load(ordering: .relaxed)
            $0.readBytes = counters.readBytes.load(ordering: .relaxed)
            $0.writtenBytes = counters.writtenBytes.load(ordering: .relaxed)
            $0.flushes = counters.flushes.load(ordering: .relaxed)
            $0.errors = counters.errors.load(ordering: .relaxed)
        }
        return status
    }
}
