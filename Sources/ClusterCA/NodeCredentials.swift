import Foundation
import X509

/// A node's TLS credentials as files, under the names nbdkit and qemu read
/// as a server (`server-cert.pem`, `server-key.pem`) and libnbd and qemu as
/// a client (`client-cert.pem`, `client-key.pem`), with the cluster's
/// `ca-cert.pem`: the directory that `--tls-certificates` names.
public struct NodeCredentials {
    public let caCertificatePEM: String
    public let certificatePEM: String
    public let keyPEM: String
    public let certificate: Certificate

    /// Writes the five files into `directory`, which must not exist or be
    /// empty; they appear together or not at all. Keys are 0600, the directory 0700.
    public func write(to directory: String) throws {
        try PrivateFiles.writeTogether(into: directory, [
            (ClusterCA.certificateFile, caCertificatePEM, secret: false),
            ("server-cert.pem", certificatePEM, secret: false),
            ("server-key.pem", keyPEM, secret: true),
            ("client-cert.pem", certificatePEM, secret: false),
            ("client-key.pem", keyPEM, secret: true),
        ])
    }
}
