"""`s3` target: S3-compatible object storage through boto3.

- Uploads over 8 MiB are multipart (boto3's TransferConfig), so an ETag is not an MD5 of the object: our
  own sha256 goes into each object's metadata (x-amz-meta-sha256) and the manifest, and verify compares
  HEAD (size, metadata) with the manifest; restore downloads and hashes.
- boto3 >= 1.36 adds CRC checksums to every upload by default, which many S3-compatible stores refuse
  (boto3 #4392, aws-cli #9214): with an `endpoint_url`, request_checksum_calculation defaults to
  when_required (setting `checksums` overrides it).
- Errors name the target, the bucket and what to check; boto3's messages hold no secret, and the keys
  are handed to the client object only.
"""
from __future__ import annotations


from agentd.release import ReleaseError
from agentd.release.targets import Storage

MULTIPART_BYTES = 8 << 20


class S3Storage(Storage):
    def __init__(self, name: str, settings, secret):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.name = name
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        checksums = settings.checksums or ("when_required" if settings.endpoint_url else None)
        extra = {"request_checksum_calculation": checksums, "response_checksum_validation": checksums} \
            if checksums else {}
        config = Config(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                        retries={"max_attempts": 2}, **extra)
        keys = {}
        if secret is not None:
            key_id, _, secret_key = secret.reveal().partition(":")
            keys = {"aws_access_key_id": key_id, "aws_secret_access_key": secret_key}
        self.client = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url,
                                                     region_name=settings.region, config=config, **keys)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _fail(self, e: Exception, what: str) -> ReleaseError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                fix = f"bucket {self.bucket} does not exist: create it, or fix release.targets.{self.name}.bucket"
            elif status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                fix = (f"access to bucket {self.bucket} refused ({code or status}): check the credential of "
                       f"release.targets.{self.name} and its permissions on the bucket")
            else:
                fix = f"the store answered {code or status}: check the store's health and the bucket {self.bucket}"
            return ReleaseError(f"target {self.name}: {what} failed: {fix}")
        if isinstance(e, NoCredentialsError):
            return ReleaseError(f"target {self.name}: no S3 credentials: set release.targets.{self.name}.credential "
                                "(a systemd credential) or credential_file, or AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY in the daemon's environment")
        if isinstance(e, EndpointConnectionError):
            return ReleaseError(f"target {self.name}: {what} failed: the store is unreachable: check "
                                f"release.targets.{self.name}.endpoint_url and the network")
        return ReleaseError(f"target {self.name}: {what} failed: {type(e).__name__}: check the store and "
                            f"release.targets.{self.name}")

    def get(self, key):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._fail(e, f"reading {key}") from None
        except Exception as e:
            raise self._fail(e, f"reading {key}") from None

    def put(self, key, data):
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)  # an object PUT is atomic
        except Exception as e:
            raise self._fail(e, f"writing {key}") from None

    def append(self, key, line):
        # S3 has no append: read and write the whole object back. The daemon's per-name lock serializes
        # the writers of one registry (one daemon per registry).
        old = self.get(key) or b""
        self.put(key, old + (line.rstrip("\n") + "\n").encode())

    def upload(self, key, src, sha256):
        try:
            self.client.upload_file(str(src), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}})
        except Exception as e:
            raise self._fail(e, f"uploading {key}") from None

    def head(self, key):
        from botocore.exceptions import ClientError

        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(e, f"checking {key}") from None
        except Exception as e:
            raise self._fail(e, f"checking {key}") from None
        return {"size": h["ContentLength"], "sha256": h.get("Metadata", {}).get("sha256")}

    def download(self, key, dest):
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        except Exception as e:
            raise self._fail(e, f"downloading {key}") from None

    def delete(self, key):
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._fail(e, f"deleting {key}") from None

    def names(self):
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                          Delimiter="/")
            prefixes = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
        except Exception as e:
            raise self._fail(e, "listing") from None
        return sorted(p[len(self.prefix):].rstrip("/") for p in prefixes
                      if self.head(f"{p[len(self.prefix):]}registry.jsonl") is not None)


def make(name, settings, secret):
    return S3Storage(name, settings, secret)
