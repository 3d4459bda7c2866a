import asyncio

from core_service.app import main

asyncio.run(main())
