import DeviceFrontend
import Foundation
import Syscalls
import Testing
import TLSSession

/// The device frontend's link to an engine over TCP with TLS, against a real
/// `keel export --tls require`: STARTTLS, the TLS handshake with the node's
/// client certificate, the export negotiated inside the session, and then the
/// hand-over to the kernel, which this host's kernel refuses (no tls.ko). The
/// hand-over itself, and the NBD driver on it, run in the kernel VM
/// (ktls-links.sh).
@Suite struct FrontendLinkTLSTests {
    let cluster: TestCluster

    init() throws {
        cluster = try TestCluster(nodes: [("server", ["--ip", "127.0.0.1"]), ("client", [])])
    }

    func export() throws -> KeelServer {
        try KeelServer(image: try cluster.scratch.image(size: 16 << 20), scratch: cluster.scratch,
                       extra: ["--tls", "require", "--tls-certificates", cluster.credentials("server")],
                       address: "127.0.0.1:\(try freeTCPPort())")
    }

    func endpoint(_ server: KeelServer) throws -> EngineEndpoint {
        EngineEndpoint(address: try SocketAddress(parsing: server.address), exportName: "")
    }

    @Test func theLinkNegotiatesInsideTLSAndNeedsTheKernelToHoldTheSession() throws {
        let server = try export()
        let credentials = try TLSCredentials.certificates(directory: cluster.credentials("client"), role: .client)
        do {
            // A kernel with tls.ko takes the session: the link is ready for the NBD driver.
            let link = try EngineLink.open(try endpoint(server), timeout: 10_000, tls: credentials)
            #expect(link.encrypted && link.size == 16 << 20)
            link.fd.close()
        } catch let failure as SystemError {
            // Past the handshake and the export's negotiation: only the kernel's part is missing here.
            #expect(failure.description.contains("no kTLS (modprobe tls)"), "\(failure)")
        }
        #expect(server.log.contains("TLS1.3"), "\(server.log)")
    }

    @Test func aPlaintextLinkToATLSEngineIsRefusedInOneLine() throws {
        let server = try export()
        let failure = #expect(throws: SystemError.self) { try EngineLink.open(try endpoint(server), timeout: 10_000) }
        #expect(failure?.description.contains("TLS") == true, "\(String(describing: failure))")
    }

    @Test func aClientOfAnotherCAIsRefusedAtTheHandshake() throws {
        let server = try export()
        let credentials = try TLSCredentials.certificates(directory: try cluster.rogue(), role: .client)
        let failure = #expect(throws: SystemError.self) {
            try EngineLink.open(try endpoint(server), timeout: 10_000, tls: credentials)
        }
        #expect(failure?.description.contains("modprobe tls") == false, "\(String(describing: failure))")
    }
}
