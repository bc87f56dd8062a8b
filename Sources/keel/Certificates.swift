import ArgumentParser
import ClusterCA
import Foundation
import NodeRegistry
import X509
import Volumes

/// `keel ca init`: the cluster's certificate authority in the state directory.
struct CA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "The cluster's certificate authority.",
        subcommands: [Init.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the cluster CA: STATE/ca/ca-key.pem (0600) and ca-cert.pem.",
            discussion: "Keep it on one node; `keel cert issue` there makes every node's credentials.")

        @Option(help: "The CA certificate's common name.")
        var name = "Keel cluster CA"

        @Option(help: "Years the CA certificate is valid.")
        var years = 10

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        func validate() throws {
            guard (1...100).contains(years) else { throw ValidationError("--years must be between 1 and 100") }
        }

        func run() throws {
            let directory = node.layout.caDirectory
            let ca: ClusterCA
            do { ca = try ClusterCA.create(in: directory, name: name, years: years) } catch { throw KeelError("\(error)") }
            try report(["directory": directory, "certificate": directory + "/" + ClusterCA.certificateFile,
                        "subject": ca.certificate.subject.description,
                        "not_after": iso8601(ca.certificate.notValidAfter)], json: json)
        }
    }
}

/// `keel cert issue NAME`: a node's credentials, signed by the cluster CA.
struct Cert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cert",
        abstract: "Node credentials signed by the cluster CA.",
        subcommands: [Issue.self])

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue a node's key and certificate, for TLS servers and clients alike.",
            discussion: """
                Writes ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and client-key.pem
                (the names nbdkit, libnbd and qemu read) into --out, default STATE/tls/NAME; keys are 0600.
                Example: keel cert issue node2 --dns node2.example --ip 10.0.0.2
                """)

        @Argument(help: "The node's name: the certificate's common name and a DNS name in it.")
        var name: String

        @Option(help: "Another DNS name the node is reached by (repeatable).")
        var dns: [String] = []

        @Option(help: "An IP address the node is reached at (repeatable).")
        var ip: [String] = []

        @Option(help: "Days the certificate is valid.")
        var days = 365

        @Option(help: "Where to write the files (a new or empty directory).")
        var out: String?

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        func validate() throws {
            guard !name.isEmpty, !name.contains("/") else { throw ValidationError("the name must be non-empty and contain no '/'") }
            guard (1...3650).contains(days) else { throw ValidationError("--days must be between 1 and 3650") }
        }

        func run() throws {
            let directory = out ?? node.layout.credentialsDirectory(name)
            let credentials: NodeCredentials
            do {
                let ca = try ClusterCA.load(from: node.layout.caDirectory)
                credentials = try ca.issue(commonName: name, dnsNames: [name] + dns, ipAddresses: ip, days: days)
                try credentials.write(to: directory)
            } catch { throw KeelError("\(error)") }
            try report(["directory": directory, "subject": credentials.certificate.subject.description,
                        "dns": [name] + dns, "ip": ip, "not_after": iso8601(credentials.certificate.notValidAfter)],
                       json: json)
        }
    }
}

private func iso8601(_ date: Date) -> String {
    ISO8601DateFormatter().string(from: date)
}

private func report(_ fields: [String: Any], json: Bool) throws {
    if json { return try printJSON(fields) }
    for key in fields.keys.sorted() {
        let value = fields[key]!
        print("\(key): \((value as? [String])?.joined(separator: ", ") ?? "\(value)")")
    }
}
