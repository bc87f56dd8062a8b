import Crypto
import Foundation
import SwiftASN1
import X509

/// The cluster's certificate authority: one ECDSA P-256 key and its
/// self-signed certificate, kept in a directory of their own (`ca-key.pem`
/// readable by its owner only, `ca-cert.pem`). It issues each node one
/// certificate for both server and client use, which nbdkit, libnbd, qemu
/// (GnuTLS) and NIOSSL read under their usual file names (`NodeCredentials`).
public struct ClusterCA {
    public static let certificateFile = "ca-cert.pem"
    public static let keyFile = "ca-key.pem"

    public let certificate: Certificate
    private let key: P256.Signing.PrivateKey

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// A new CA in `directory`, which must not hold one already; the files
    /// appear together or not at all.
    public static func create(in directory: String, name: String = "Keel cluster CA",
                              years: Int = 10, now: Date = Date()) throws -> ClusterCA {
        if FileManager.default.fileExists(atPath: directory + "/" + keyFile) {
            throw Failure(description: "a CA already exists in \(directory); use it, or remove that directory to start a new cluster")
        }
        let key = P256.Signing.PrivateKey()
        let subject = try DistinguishedName {
            OrganizationName("Keel")
            CommonName(name)
        }
        let publicKey = Certificate.PublicKey(key.publicKey)
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(Double(years) * 365.25 * 86400),
            issuer: subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: publicKey)
            },
            issuerPrivateKey: Certificate.PrivateKey(key))
        try PrivateFiles.writeTogether(into: directory, [
            (keyFile, try Certificate.PrivateKey(key).serializeAsPEM().pemString, secret: true),
            (certificateFile, try certificate.serializeAsPEM().pemString, secret: false),
        ])
        return ClusterCA(certificate: certificate, key: key)
    }

    /// The CA in `directory`.
    public static func load(from directory: String) throws -> ClusterCA {
        let keyPath = directory + "/" + keyFile
        guard let keyPEM = try? String(contentsOfFile: keyPath, encoding: .utf8),
              let certificatePEM = try? String(contentsOfFile: directory + "/" + certificateFile, encoding: .utf8) else {
            throw Failure(description: "no CA in \(directory); make one with `keel ca init`")
        }
        do {
            return ClusterCA(certificate: try Certificate(pemEncoded: certificatePEM),
                             key: try P256.Signing.PrivateKey(pemRepresentation: keyPEM))
        } catch {
            throw Failure(description: "the CA in \(directory) cannot be read (\(error)); restore its files")
        }
    }

    /// A node's key and certificate, signed by this CA: usable as a TLS
    /// server and as a client, for the DNS names and IP addresses given.
    public func issue(commonName: String, dnsNames: [String], ipAddresses: [String],
                      days: Int, now: Date = Date()) throws -> NodeCredentials {
        let key = P256.Signing.PrivateKey()
        let publicKey = Certificate.PublicKey(key.publicKey)
        var names = dnsNames.map { GeneralName.dnsName($0) }
        for address in ipAddresses {
            guard let bytes = Self.addressBytes(address) else {
                throw Failure(description: "'\(address)' is not an IPv4 or IPv6 address; give addresses with --ip and names with --dns")
            }
            names.append(.ipAddress(ASN1OctetString(contentBytes: bytes[...])))
        }
        let subject = try DistinguishedName {
            OrganizationName("Keel")
            CommonName(commonName)
        }
        let authorityKey = try certificate.extensions.subjectKeyIdentifier?.keyIdentifier
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(Double(days) * 86400),
            issuer: self.certificate.subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames(names)
                SubjectKeyIdentifier(hash: publicKey)
                AuthorityKeyIdentifier(keyIdentifier: authorityKey)
            },
            issuerPrivateKey: Certificate.PrivateKey(self.key))
        return NodeCredentials(caCertificatePEM: try self.certificate.serializeAsPEM().pemString,
                               certificatePEM: try certificate.serializeAsPEM().pemString,
                               keyPEM: try Certificate.PrivateKey(key).serializeAsPEM().pemString,
                               certificate: certificate)
    }

    static func addressBytes(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }
}
