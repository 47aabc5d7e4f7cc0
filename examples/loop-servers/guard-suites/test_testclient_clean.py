from fastapi.testclient import TestClient

from fastapi_app import app


def test_endpoints_that_never_hold_the_loop():
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/fast").status_code == 200
            assert client.get("/suspended/ci?ms=300").status_code == 200
            assert client.get("/sync/ci?ms=300").status_code == 200
