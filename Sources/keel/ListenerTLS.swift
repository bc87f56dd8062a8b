import ArgumentParser
import Foundation
import ControlAPI
import LibNBD
import Logging
import NodeRegistry
import NBDProtocol
import NBDServer
import Syscalls
import TLSSession
import Volumes

/// `--tls` on a listening command: `off` serves plaintext (and is the
/// explicit consent a non-loopback plaintext listener needs), `on` offers
/// STARTTLS, `require` answers nothing but STARTTLS and ABORT before it.
enum TLSMode: String, ExpressibleByArgument, CaseIterable {
    case off, on, require

    var policy: Handshake.TLSPolicy {
        switch self {
        case .off: .off
        case .on: .on
        case .require: .require
        }
    }
}


extension ServingOptions {
    func validateTLS() throws {
        if tlsCertificates != nil && tlsPsk != nil {
            throw ValidationError("--tls-certificates and --tls-psk exclude each other; give one")
        }
    }

    /// --tls-certificates, else the node's own credentials in the state directory.
    var certificatesDirectory: String? {
        tlsCertificates ?? (tlsPsk == nil ? nodeCredentialsDirectory() : nil)
    }

    /// Credentials given to a command that would not use them are a mistake worth one line.
    func refuseUnusedCredentials(links: LinkTLSMode? = nil) throws {
        let offered = tls == .on || tls == .require
        if !offered && links != .require && (tlsCertificates != nil || tlsPsk != nil) {
            throw KeelError(links == nil
                ? "--tls-certificates and --tls-psk take effect with --tls on or --tls require"
                : "--tls-certificates and --tls-psk take effect with --tls on|require (the listener) or --replica-tls require (the links)")
        }
        if tlsUsername != nil && (links != .require || tlsPsk == nil) {
            throw KeelError("--tls-username names the PSK identity of --replica-tls require links; give it with --tls-psk")
        }
    }

    /// The links to the replicas: TLS with the node's client certificate
    /// (client-cert.pem in --tls-certificates) or a PSK identity.
    func linkTLS(_ mode: LinkTLSMode) throws -> LinkTLS {
        guard mode == .require else { return .off }
        if let certificatesDirectory { return LinkTLS(credentials: .certificates(directory: certificatesDirectory)) }
        guard let tlsPsk else {
            throw KeelError("--replica-tls require needs --tls-certificates DIR (with client-cert.pem) or --tls-psk FILE with --tls-username NAME; by default the node's credentials, STATE/tls/NAME, when there is exactly one")
        }
        guard let tlsUsername else { throw KeelError("--replica-tls require with --tls-psk needs --tls-username NAME") }
        return LinkTLS(credentials: .preSharedKey(file: tlsPsk, username: tlsUsername))
    }

    /// The listener's TLS: its credentials loaded now, so a bad file is one line before anything listens.
    func serverTLS() throws -> ServerTLS {
        guard let tls, tls != .off else { return .off }
        guard tlsPsk != nil || certificatesDirectory != nil else {
            throw KeelError("--tls \(tls.rawValue) needs --tls-certificates DIR or --tls-psk FILE (psktool); by default the node's credentials, STATE/tls/NAME from `keel cert issue`, when there is exactly one")
        }
        do {
            if let tlsPsk { return ServerTLS(policy: tls.policy, credentials: try .serverKeys(file: tlsPsk)) }
            let credentials = try TLSCredentials.certificates(directory: certificatesDirectory!, role: .server,
                                                              verifyPeer: tlsVerifyPeer)
            return ServerTLS(policy: tls.policy, credentials: credentials)
        } catch {
            throw KeelError("TLS credentials: \(error)")
        }
    }

    /// The NBD listener at `address`, checked against `--tls`.
    func checkNBDListener(_ address: SocketAddress, logger: Logger) throws {
        try checkPlaintextListener(address, option: "--listen", tls: tls, logger: logger)
    }

    /// The control API's TLS: with the listener's certificates, mutual TLS
    /// (a caller needs a certificate of the cluster CA); otherwise plaintext,
    /// PSK included, as NIOSSL has none.
    var controlTLS: ControlTLS {
        guard tls == .on || tls == .require, let certificatesDirectory else { return .plaintext }
        return ControlTLS(certificates: certificatesDirectory)
    }

    /// A gRPC control listener: without certificates it is plaintext, so
    /// beyond loopback it needs the plaintext consent (`--tls off`) itself.
    func checkControlListener(_ address: SocketAddress, logger: Logger) throws {
        let mode: TLSMode? = controlTLS.certificates != nil ? .require : (tls == .off ? .off : nil)
        try checkPlaintextListener(address, option: "--control", tls: mode, logger: logger)
    }

    /// Control calls to the replicas go with the links: mutual TLS when the links use certificates.
    func controlCallsTLS(_ links: LinkTLSMode) -> ControlTLS {
        links == .require && certificatesDirectory != nil ? ControlTLS(certificates: certificatesDirectory) : .plaintext
    }
}

/// `--replica-tls`: whether the links a command opens to replicas require TLS.
enum LinkTLSMode: String, ExpressibleByArgument, CaseIterable {
    case off, require
}

/// Refuses a plaintext listener that others than this host can reach,
/// unless `--tls off` says so; warns once when it does. Loopback TCP
/// addresses and unix sockets are served as they always were.
func checkPlaintextListener(_ address: SocketAddress, option: String, tls: TLSMode?, logger: Logger) throws {
    // An address that does not resolve fails at bind, with its own message.
    guard Socket.isLoopbackOnly(address) == false else { return }
    switch tls {
    case .require?:
        return
    case .on?:
        logger.warning("\(option) \(address): clients that do not start TLS are served in plaintext (--tls on)")
    case .off?:
        logger.warning("\(option) \(address): serving in plaintext to other hosts (--tls off)")
    case nil:
        throw KeelError("\(option) \(address) is reachable from other hosts and the link would be plaintext: anyone reaching it could read and write the volume; pass --tls require with --tls-certificates or --tls-psk, listen on loopback or a unix socket, or pass --tls off to accept that")
    }
}

/// `--tls-certificates` on a command that calls a control API: the node's
/// client certificate, for daemons whose control requires mutual TLS.
struct ControlClientOptions: ParsableArguments {
    @Option(help: ArgumentHelp("ca-cert.pem, client-cert.pem and client-key.pem for a control API that requires TLS (default: $KEEL_TLS_CERTIFICATES, else for a TCP address the node's STATE/tls/NAME when there is one, else plaintext).", valueName: "dir"))
    var tlsCertificates: String?

    var credentials: ControlCredentials { ControlCredentials(certificates: tlsCertificates) }

    /// This command's control calls take these credentials: see `ControlCredentials`.
    func apply() { credentials.apply() }
}
