import Crypto
import Foundation
@testable import S3Client
import Testing

/// The signer against the worked examples AWS publishes for S3 ("Examples: Signature calculations",
/// Authenticating Requests: Using the Authorization Header): same key, same requests, same signatures.
@Suite struct SigV4Tests {
    let signer = SigV4(accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1")
    let host = ("Host", "examplebucket.s3.amazonaws.com")
    let date = ("x-amz-date", "20130524T000000Z")

    func signature(_ method: String, _ path: String, _ query: [(String, String)], _ headers: [(String, String)]) -> String {
        String(signer.authorization(method: method, path: path, query: query, headers: headers).split(separator: "=").last!)
    }

    @Test func getObjectWithARange() {
        let headers = [host, ("Range", "bytes=0-9"), ("x-amz-content-sha256", SigV4.emptyPayloadHash), date]
        let (canonical, signed) = signer.canonicalRequest(method: "GET", path: "/test.txt", query: [], headers: headers)
        #expect(signed == "host;range;x-amz-content-sha256;x-amz-date")
        #expect(canonical == "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
            + "x-amz-content-sha256:\(SigV4.emptyPayloadHash)\nx-amz-date:20130524T000000Z\n\n"
            + "host;range;x-amz-content-sha256;x-amz-date\n\(SigV4.emptyPayloadHash)")
        #expect(hex(SHA256.hash(data: Data(canonical.utf8))) == "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972")
        #expect(signature("GET", "/test.txt", [], headers) == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
        #expect(signer.authorization(method: "GET", path: "/test.txt", query: [], headers: headers).hasPrefix(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature="))
    }

    @Test func putObjectWithAnEncodedKey() {
        let body = Array("Welcome to Amazon S3.".utf8)
        #expect(sha256Hex(body) == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")
        let headers = [host, ("Date", "Fri, 24 May 2013 00:00:00 GMT"), date, ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
                       ("x-amz-content-sha256", sha256Hex(body))]
        let path = "/" + SigV4.encode("test$file.text", keepSlash: true)
        #expect(path == "/test%24file.text")
        #expect(signature("PUT", path, [], headers) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
    }

    @Test func getBucketLifecycleWithAnEmptyQueryValue() {
        let headers = [host, date, ("x-amz-content-sha256", SigV4.emptyPayloadHash)]
        #expect(signature("GET", "/", [("lifecycle", "")], headers) == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")
    }

    @Test func listObjectsWithSortedQueryParameters() {
        let headers = [host, date, ("x-amz-content-sha256", SigV4.emptyPayloadHash)]
        #expect(signature("GET", "/", [("prefix", "J"), ("max-keys", "2")], headers)
            == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    }

    @Test func settingsComeFromTheEnvironmentThenTheSharedFiles() throws {
        let directory = FileManager.default.temporaryDirectory.path + "/keel-aws-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n[other]\naws_access_key_id = OTHER\naws_secret_access_key = OS\n"
            .write(toFile: directory + "/credentials", atomically: true, encoding: .utf8)
        try "[default]\nregion = eu-west-1\n[profile other]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:9000/\n"
            .write(toFile: directory + "/config", atomically: true, encoding: .utf8)
        let files = ["AWS_SHARED_CREDENTIALS_FILE": directory + "/credentials", "AWS_CONFIG_FILE": directory + "/config"]
        let fromFiles = try S3Settings.fromEnvironment(files)
        #expect(fromFiles.accessKey == "FILEKEY")
        #expect(fromFiles.region == "eu-west-1")
        #expect(fromFiles.endpoint == "https://s3.eu-west-1.amazonaws.com")
        let other = try S3Settings.fromEnvironment(files.merging(["AWS_PROFILE": "other"]) { $1 })
        #expect((other.accessKey, other.region, other.endpoint) == ("OTHER", "ap-south-1", "http://127.0.0.1:9000"))
        let fromEnvironment = try S3Settings.fromEnvironment(files.merging([
            "AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "ENVSECRET", "AWS_REGION": "us-west-2",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:18433"]) { $1 })
        #expect((fromEnvironment.accessKey, fromEnvironment.secretKey, fromEnvironment.region, fromEnvironment.endpoint)
            == ("ENVKEY", "ENVSECRET", "us-west-2", "http://127.0.0.1:18433"))
        #expect(throws: S3Error.self) { try S3Settings.fromEnvironment(["HOME": directory + "/none"]) }
    }

    /// A scheduled backup's unit loads the credentials file as credential `aws` (LoadCredential=aws:FILE).
    @Test func aSystemdCredentialIsTheCredentialsFile() throws {
        let directory = FileManager.default.temporaryDirectory.path + "/keel-creds-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try "[default]\naws_access_key_id = UNITKEY\naws_secret_access_key = UNITSECRET\n".write(toFile: directory + "/aws", atomically: true, encoding: .utf8)
        let settings = try S3Settings.fromEnvironment(["CREDENTIALS_DIRECTORY": directory, "HOME": directory + "/none",
                                                       "AWS_ENDPOINT_URL": "http://127.0.0.1:18433"])
        #expect((settings.accessKey, settings.secretKey) == ("UNITKEY", "UNITSECRET"))
        #expect(throws: S3Error.self) { try S3Settings.fromEnvironment(["CREDENTIALS_DIRECTORY": directory + "/none", "HOME": directory + "/none"]) }
    }
}
