import asyncio

from reaper_worker.app import main

asyncio.run(main())
