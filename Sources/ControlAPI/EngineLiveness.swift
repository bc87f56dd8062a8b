import Foundation
import GRPCCore
import Syscalls

/// Whether the engine behind `control` answers its Alive call within
/// `seconds` (serving, or still claiming its replicas). Retried until then:
/// an engine that has just started may not listen yet. An engine stopped by
/// a signal, or hung, never answers.
public func engineAnswers(control: Syscalls.SocketAddress, within seconds: Double) async -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
        let left = deadline.timeIntervalSinceNow
        if left <= 0 { return false }
        var options = CallOptions.defaults
        options.timeout = .milliseconds(Int64(left * 1000))
        let answered = (try? await withControlClient(control, {
            try await Keel_Control_V1_EngineControl.Client(wrapping: $0).alive(.init(), options: options)
        })) != nil
        if answered { return true }
        try? await Task.sleep(for: .milliseconds(200))
    }
}
