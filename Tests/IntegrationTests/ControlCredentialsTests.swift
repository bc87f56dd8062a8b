import ControlAPI
import Foundation
import Syscalls
import Testing
import Volumes

/// One command may call a node agent over TCP (TLS) and this node's device
/// frontend over a unix socket (plaintext) in turn: its control calls choose
/// their TLS by the address they go to.
@Suite struct ControlCredentialsTests {
    let agent = Syscalls.SocketAddress.tcp(host: "10.77.2.2", port: 7800)
    let frontend = Syscalls.SocketAddress.unix(path: "/var/lib/keel/run/frontend-db.control")

    @Test func namedCertificatesServeBothTransports() {
        let calls = ControlCredentials(certificates: "/etc/keel/tls/client").forCalls
        #expect(calls.tls(to: agent).certificates == "/etc/keel/tls/client")
        #expect(calls.tls(to: frontend).certificates == "/etc/keel/tls/client")
    }

    @Test func withNoneNamedAUnixSocketIsPlaintextWhateverTheNodeHas() throws {
        try #require(ProcessInfo.processInfo.environment["KEEL_TLS_CERTIFICATES"] == nil)
        let calls = ControlCredentials().forCalls
        #expect(calls.tls(to: frontend) == .plaintext)
        #expect(calls.tls(to: agent).certificates == nodeCredentialsDirectory())
    }

    @Test func eachCallTakesItsTransportsSetting() {
        let calls = ControlTLS.ForCalls(overTCP: ControlTLS(certificates: "/node"), overUnix: .plaintext)
        #expect(calls.tls(to: agent) == ControlTLS(certificates: "/node"))
        #expect(calls.tls(to: frontend) == .plaintext)
    }
}
