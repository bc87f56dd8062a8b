import Foundation

/// Where and as whom to reach S3, taken the way AWS's own tools take it: the environment
/// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL[_S3], AWS_REGION, AWS_DEFAULT_REGION,
/// AWS_PROFILE), then the shared files (~/.aws/credentials, ~/.aws/config, or AWS_SHARED_CREDENTIALS_FILE
/// and AWS_CONFIG_FILE); under systemd, the credentials file the unit loaded as `aws`.
public struct S3Settings: Sendable {
    public var accessKey: String
    public var secretKey: String
    public var region: String
    /// scheme://host[:port], no trailing slash. Requests use path-style addressing (endpoint/bucket/key).
    public var endpoint: String

    public init(accessKey: String, secretKey: String, region: String, endpoint: String) {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.region = region
        self.endpoint = endpoint
    }

    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) throws -> S3Settings {
        let home = environment["HOME"] ?? "/root"
        let profile = environment["AWS_PROFILE"] ?? "default"
        // A systemd service's credential `aws` (LoadCredential=aws:FILE) comes before ~/.aws.
        let loaded = environment["CREDENTIALS_DIRECTORY"].map { $0 + "/aws" }.flatMap { FileManager.default.isReadableFile(atPath: $0) ? $0 : nil }
        let credentials = IniFile.read(environment["AWS_SHARED_CREDENTIALS_FILE"] ?? loaded ?? home + "/.aws/credentials")[profile] ?? [:]
        let config = IniFile.read(environment["AWS_CONFIG_FILE"] ?? home + "/.aws/config")[profile == "default" ? "default" : "profile " + profile] ?? [:]
        func value(_ variable: String, _ key: String) -> String? {
            environment[variable].flatMap { $0.isEmpty ? nil : $0 } ?? credentials[key] ?? config[key]
        }
        guard let accessKey = value("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
              let secretKey = value("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key") else {
            throw S3Error("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them in ~/.aws/credentials")
        }
        let region = environment["AWS_REGION"] ?? environment["AWS_DEFAULT_REGION"] ?? config["region"] ?? "us-east-1"
        var endpoint = environment["AWS_ENDPOINT_URL_S3"] ?? environment["AWS_ENDPOINT_URL"] ?? config["endpoint_url"]
            ?? "https://s3.\(region).amazonaws.com"
        while endpoint.hasSuffix("/") { endpoint.removeLast() }
        guard endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://") else {
            throw S3Error("the S3 endpoint \(endpoint) is not an http:// or https:// URL (AWS_ENDPOINT_URL)")
        }
        return S3Settings(accessKey: accessKey, secretKey: secretKey, region: region, endpoint: endpoint)
    }
}

public struct S3Error: Error, CustomStringConvertible {
    public let description: String
    /// The HTTP status, when the server answered.
    public var status: Int?
    public init(_ description: String, status: Int? = nil) {
        self.description = description
        self.status = status
    }
}

/// The AWS shared files' INI format: [section] lines and key = value lines.
enum IniFile {
    static func read(_ path: String) -> [String: [String: String]] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [:] }
        var sections: [String: [String: String]] = [:]
        var section = ""
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("["), line.hasSuffix("]") {
                section = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
            } else if let equals = line.firstIndex(of: "=") {
                sections[section, default: [:]][line[..<equals].trimmingCharacters(in: .whitespaces)] =
                    line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces)
            }
        }
        return sections
    }
}
