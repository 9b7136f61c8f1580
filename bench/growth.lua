-- wrk script for the growth scenario: bench/events.lua's events, timestamped in a window.
--
--   wrk -t2 -c20 -d10s -s bench/growth.lua http://127.0.0.1:8000/events -- 500 FROM TO
--
-- Events, users, metadata and event_ids are those of bench/events.lua (loaded from the
-- same directory); only each event's timestamp is replaced by an instant drawn
-- uniformly from [FROM, TO) (Unix seconds), written with the same mix of UTC offsets as
-- events.lua but meaning that instant. bench/growth.py moves the window forward as the
-- table grows, so that the partitions fill one after the other, as in production.

local here = debug.getinfo(1, "S").source:sub(2):match("^(.*/)") or "./"
dofile(here .. "events.lua")

-- The offsets of events.lua, in minutes east of UTC; "" (no offset) is read as UTC.
local OFFSETS = {{"Z", 0}, {"Z", 0}, {"Z", 0}, {"+00:00", 0}, {"+02:00", 120},
                 {"-05:00", -300}, {"+05:30", 330}, {"", 0}}
local from_s, to_s = 0, 0

local events_init = init
function init(args)
   events_init(args)
   from_s = tonumber(args[2]) or os.time()
   to_s = tonumber(args[3]) or from_s + 1
end

local function stamp()
   local instant = from_s + math.random() * (to_s - from_s)
   local offset = OFFSETS[math.random(#OFFSETS)]
   local second = math.floor(instant)
   return '"timestamp":"' .. os.date("!%Y-%m-%dT%H:%M:%S", second + offset[2] * 60) ..
      string.format(".%03d", math.floor((instant - second) * 1000)) .. offset[1] .. '"'
end

local events_request = request
function request()
   local head, body = events_request():match("^(.-\r\n\r\n)(.*)$")
   body = body:gsub('"timestamp":"[^"]*"', stamp)
   -- The body's length changed with the offsets: wrk.format computed the old one.
   head = head:gsub("Content%-Length: %d+", "Content-Length: " .. #body)
   return head .. body
end
