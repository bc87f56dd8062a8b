import ControlAPI
import GRPCCore
import Syscalls

typealias EngineStub = Keel_Control_V1_EngineControl.Client<ControlTransport>

/// Calls an engine's control API (its `--control` address) from a command;
/// a refusal or an unreachable engine becomes one line for the user.
func callEngine<T: Sendable>(_ engine: String, doing what: String,
                             _ body: @escaping @Sendable (EngineStub) async throws -> T) throws -> T {
    let address = try parseListenAddress(engine, option: "--engine")
    do {
        return try blocking {
            try await withControlClient(address) { try await body(EngineStub(wrapping: $0)) }
        }
    } catch let error as RPCError where error.code != .unavailable {
        throw CLIError("the engine at \(engine) refused to \(what): \(error.message)")
    } catch let error as RPCError {
        throw CLIError("cannot reach the engine's control API at \(engine): \(error.message)")
    } catch {
        throw CLIError("cannot reach the engine's control API at \(engine): \(error)")
    }
}
