-- Complete TOTP logins (start, then finish) for wrk, one connection per thread:
--   wrk -t N -c N -d 15s --timeout 10s -s bench/login.lua <proxy url> -- <users file> N <location id>
-- The users file has one line per device: "<public key> <TOTP code>". bench/login.py writes
-- it just before starting wrk with each user's code of the current time step, which the core
-- accepts for 30 to 60 s more (steps T and T-1), so a run of at most 30 s needs no code
-- computed here. Every TOTP step is taken once per user: each login is a user of its own,
-- and a thread that has used all of its users stops (reported as `exhausted`).
-- With one connection per thread, request() and response() alternate for that connection:
-- the thread's own state says which half of a login comes next.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local users = {}
local next_user = 1
local halfway = false  -- a start answered, its finish next
local token = nil
logins = 0
failed = 0
exhausted = 0

function init(args)
   local file, thread_count, location = args[1], tonumber(args[2]), args[3]
   local index = 0
   for line in io.lines(file) do
      if index % thread_count == id then
         local pubkey, code = line:match("^(%S+) (%S+)$")
         table.insert(users, {
            start = wrk.format("POST", "/api/v1/client-mfa/start", {["Content-Type"] = "application/json"},
               '{"location_id":' .. location .. ',"pubkey":"' .. pubkey .. '","method":0}'),
            code = code,
         })
      end
      index = index + 1
   end
end

function request()
   if halfway then
      return wrk.format("POST", "/api/v1/client-mfa/finish", {["Content-Type"] = "application/json"},
         '{"token":"' .. token .. '","code":"' .. users[next_user].code .. '"}')
   end
   local user = users[next_user]
   if user == nil then
      exhausted = 1
      wrk.thread:stop()
      return wrk.format("GET", "/api/v1/health")
   end
   return user.start
end

function response(status, headers, body)
   if users[next_user] == nil then
      return
   end
   if not halfway then
      token = status == 200 and body:match('"token"%s*:%s*"([^"]+)"') or nil
      if token then
         halfway = true
      else
         failed = failed + 1
         next_user = next_user + 1
      end
      return
   end
   halfway = false
   if status == 200 then
      logins = logins + 1
   else
      failed = failed + 1
   end
   next_user = next_user + 1
end

function done(summary, latency, requests)
   local logins_total, failed_total, exhausted_total = 0, 0, 0
   for _, thread in ipairs(threads) do
      logins_total = logins_total + thread:get("logins")
      failed_total = failed_total + thread:get("failed")
      exhausted_total = exhausted_total + thread:get("exhausted")
   end
   io.write(string.format(
      'WRK_RESULT {"duration_us":%d,"requests":%d,"logins":%d,"failed":%d,"threads_exhausted":%d,' ..
      '"request_p50_us":%d,"request_p99_us":%d,"socket_errors":%d}\n',
      summary.duration, summary.requests, logins_total, failed_total, exhausted_total,
      latency:percentile(50), latency:percentile(99),
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
