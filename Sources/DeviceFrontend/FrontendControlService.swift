import ControlAPI
import GRPCCore
import Syscalls

/// The device frontend's side of the control API: an engine switch.
public struct FrontendControlService: Keel_Control_V1_FrontendControl.SimpleServiceProtocol {
    let frontend: DeviceFrontend

    public init(frontend: DeviceFrontend) {
        self.frontend = frontend
    }

    public func hold(request: Keel_Control_V1_HoldRequest, context: ServerContext) async throws -> Keel_Control_V1_Held {
        guard request.holdSeconds > 0 && request.holdSeconds <= 600 else {
            throw RPCError(code: .invalidArgument, message: "hold_seconds must be above 0 and at most 600")
        }
        // A suspend waits for the I/O in flight: off the cooperative pool.
        let held = try await offThePool { try refusing { try frontend.holdIO(seconds: request.holdSeconds) } }
        return .with {
            $0.drainedMicroseconds = UInt64(held.took * 1e6)
            $0.inFlight = UInt32(clamping: held.inFlight)
        }
    }

    public func switchEngine(request: Keel_Control_V1_SwitchEngineRequest,
                             context: ServerContext) async throws -> Keel_Control_V1_Released {
        let address: Syscalls.SocketAddress
        do { address = try Syscalls.SocketAddress(parsing: request.engine) } catch {
            throw RPCError(code: .invalidArgument, message: "engine: \(error)")
        }
        let next = EngineEndpoint(address: address, exportName: frontend.engine.exportName)
        let held = try await offThePool { try refusing { try frontend.switchEngine(to: next) } }
        return .with {
            $0.heldMicroseconds = UInt64(held * 1e6)
            $0.engine = "\(frontend.engine)"
        }
    }

    public func resume(request: Keel_Control_V1_ResumeRequest, context: ServerContext) async throws -> Keel_Control_V1_Released {
        let held = try await offThePool { try refusing { try frontend.resumeHeld() } }
        return .with {
            $0.heldMicroseconds = UInt64(held * 1e6)
            $0.engine = "\(frontend.engine)"
        }
    }

    private func refusing<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            throw RPCError(code: .failedPrecondition, message: "\(error)")
        }
    }
}
