import asyncio

import httpx

from fastapi_app import app


def test_a_blocking_endpoint():
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/fast")).status_code == 200
            assert (await client.get("/sleep/ci?ms=300")).status_code == 200

    asyncio.run(run())
