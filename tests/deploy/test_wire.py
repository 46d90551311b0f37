"""Wire format and certificates of a deployment: round trips and clear refusals."""

import numpy as np
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fljax.deploy import certs, wire


def test_pack_round_trip_keeps_values_and_types():
    fields = {"op": "train", "w": np.arange(6, dtype=np.float32).reshape(2, 3), "key": np.uint32([1, 2])}
    fields |= {"blob": b"\x00\x01\xff", "flag": True}
    got = wire.unpack(wire.pack(fields))
    assert got["op"] == "train" and got["blob"] == b"\x00\x01\xff" and bool(got["flag"])
    np.testing.assert_array_equal(got["w"], fields["w"])
    assert got["w"].dtype == np.float32 and got["key"].dtype == np.uint32


@pytest.mark.parametrize("data", [b"", b"garbage", wire.pack({"a": 1})[:-7]])
def test_malformed_bytes_are_refused(data):
    with pytest.raises(wire.MalformedMessage, match="malformed"):
        wire.unpack(data)


def test_pickled_objects_are_refused():
    import io

    buf = io.BytesIO()
    np.savez(buf, obj=np.array([{"a": 1}], dtype=object))  # would need pickle to load
    with pytest.raises(wire.MalformedMessage):
        wire.unpack(buf.getvalue())


def test_oversized_is_refused_before_parsing():
    data = wire.pack({"x": np.zeros(1000, np.float32)})
    assert wire.unpack(data, max_bytes=len(data))["x"].shape == (1000,)
    with pytest.raises(wire.OversizedMessage, match=f"{len(data)} bytes > limit {len(data) - 1}"):
        wire.unpack(data, max_bytes=len(data) - 1)


def test_tree_round_trip_and_shape_checks():
    template = {"a": np.zeros((2, 3), np.float32), "b": {"c": np.zeros((4,), np.float32)}}
    tree = {"a": np.ones((2, 3), np.float32), "b": {"c": np.arange(4, dtype=np.float32)}}
    got = wire.arrays_to_tree(wire.tree_to_arrays(tree, "p"), "p", template)
    np.testing.assert_array_equal(got["b"]["c"], tree["b"]["c"])
    wrong = wire.tree_to_arrays({"a": np.ones((3, 2), np.float32), "b": {"c": np.zeros(4, np.float32)}}, "p")
    with pytest.raises(wire.ShapeMismatch, match=r"shape \(3, 2\) float32, expected \(2, 3\) float32"):
        wire.arrays_to_tree(wrong, "p", template)
    with pytest.raises(wire.ShapeMismatch, match="float64"):
        wire.arrays_to_tree(wire.tree_to_arrays(tree | {"a": np.ones((2, 3))}, "p"), "p", template)
    with pytest.raises(wire.ShapeMismatch, match="1 arrays p\\*, expected 2"):
        wire.arrays_to_tree({"p0": tree["a"]}, "p", template)


def test_certificates_chain_to_the_ca_and_name_localhost(tmp_path):
    paths = certs.generate(tmp_path, ("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (paths.server_key.stat().st_mode & 0o777) == 0o600
    other = certs.generate(tmp_path / "other")
    with pytest.raises(InvalidSignature):  # another CA (same name) did not sign it
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(other.ca_cert.read_bytes()))
    with pytest.raises(ValueError, match="at least one host"):
        certs.generate(tmp_path / "none", ())
