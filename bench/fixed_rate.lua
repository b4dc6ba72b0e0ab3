-- wrk at a fixed request rate (Debian has no wrk2): `WRK_RATE=1000 wrk -t1 -c16 -s THIS URL`.
--
-- Each request takes the next slot of one schedule (start + i / rate) shared by the
-- thread's connections, and wrk's delay() holds it until that slot.  wrk then measures
-- each request in C, from its send to its response, with microsecond resolution.  A
-- request whose slot passed while every connection was busy is sent at once and its
-- wait is not counted (wrk2 would count it); at 1,000 req/s over 16 connections a
-- connection is free again within a few ms unless the proxy stalls, and a stall shows
-- as an achieved rate under the target.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } pyambient_timespec;
int clock_gettime(int clock_id, pyambient_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now = ffi.new("pyambient_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
end

local step_ms = 1000 / tonumber(os.getenv("WRK_RATE") or "1000")
local next_slot = nil

function delay()
  local t = now_ms()
  next_slot = next_slot or t
  local wait = next_slot - t
  next_slot = next_slot + step_ms
  if wait <= 0 then
    return 0
  end
  return math.floor(wait + 0.5)  -- wrk's timers count whole milliseconds
end
