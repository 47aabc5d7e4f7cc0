import asyncio

import httpx

from fastapi_app import app


def test_endpoints_that_never_hold_the_loop():
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(3):
                assert (await client.get("/fast")).status_code == 200
                assert (await client.get("/suspended/ci?ms=300")).status_code == 200
                assert (await client.get("/sync/ci?ms=300")).status_code == 200

    asyncio.run(run())
