from fastapi.testclient import TestClient

from fastapi_app import app


def test_a_blocking_endpoint():
    # TestClient runs the app's event loop on another thread.
    with TestClient(app) as client:
        assert client.get("/fast").status_code == 200
        assert client.get("/sleep/ci?ms=300").status_code == 200
