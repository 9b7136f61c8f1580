-- wrk script: POST realistic clickstream events, each with an event_id of its own.
--
--   wrk -t2 -c100 -d20s --latency -s bench/events.lua http://127.0.0.1:8000/event
--   wrk -t2 -c20 -d20s --latency -s bench/events.lua http://127.0.0.1:8000/events -- 500
--
-- The optional argument is the number of events per request: 1 (the default) sends
-- one JSON object (POST /event); more send a JSON array of that many (POST /events).
--
-- Every event_id is unique: a random prefix per thread and run, the thread's number
-- and a per-thread counter. A fixed body would be stored once (the collector is
-- idempotent by event_id) and make the committed rate look far better than it is.
--
-- At the end it prints one line that bench/wrk.py reads:
--   statuses: 202=12345 400=0 ...   (responses by HTTP status, over all threads)

local threads = {}
local next_thread = 1

function setup(thread)
   thread:set("thread_number", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

local HOT_USERS = 50          -- a few very active users ...
local HOT_USER_SHARE = 0.3    -- ... send this share of the events
local COLD_USERS = 5000000    -- the long tail
local TYPES = {"page_view", "page_view", "page_view", "click", "scroll", "add_to_cart",
               "search", "purchase"}
local PAGES = {"/", "/products/%d", "/cart", "/checkout", "/search", "/blog/%d"}
local DEVICES = {
   '{"os":"Android","version":"14","screen":{"w":412,"h":915}}',
   '{"os":"iOS","version":"17.4.1","screen":{"w":390,"h":844}}',
   '{"os":"Windows","version":"11","screen":{"w":1920,"h":1080}}',
   '{"os":"macOS","version":"14.3","screen":{"w":1512,"h":982}}',
}
local UTMS = {
   '{"source":"newsletter","medium":"email","campaign":"spring-sale"}',
   '{"source":"google","medium":"cpc","campaign":"brand","term":"café crème"}',
   '{"source":"facebook","medium":"social","campaign":"été-2024"}',
   '{}',
}
local TEXTS = {"Café crème ☕", "naïve résumé", "日本語のテキスト", "emoji 🚀🔥",
               "quotes \\\"and\\\" back\\\\slashes", "plain ascii"}
local OFFSETS = {"Z", "Z", "Z", "+00:00", "+02:00", "-05:00", "+05:30", ""}

local per_request = 1
local prefix = 0
local counter = 0
statuses = {}  -- global: done() reads each thread's with thread:get
local last_second = -1
local stamp = ""

function init(args)
   per_request = tonumber(args[1]) or 1
   -- thread_number was set by setup(); seed so that each thread and run differ.
   math.randomseed(os.time() * 1000 + thread_number * 7919 + math.floor(os.clock() * 1e6))
   prefix = math.random(0, 0x7fffffff)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

local function event_id()
   counter = counter + 1
   -- A v4-shaped UUID: prefix, thread, random, variant, counter. Unique per thread
   -- by the counter, across threads by the thread number.
   return string.format("%08x-%04x-4%03x-%04x-%04x%08x", prefix, thread_number,
                        math.random(0, 0xfff), 0x8000 + math.random(0, 0x3fff),
                        math.random(0, 0xffff), counter)
end

local function now()
   local second = os.time()
   if second ~= last_second then
      last_second = second
      stamp = os.date("!%Y-%m-%dT%H:%M:%S", second)
   end
   return stamp .. string.format(".%03d", math.random(0, 999))
end

local function user_id()
   if math.random() < HOT_USER_SHARE then
      return math.random(1, HOT_USERS)
   end
   return HOT_USERS + math.random(1, COLD_USERS)
end

local function event()
   local page = string.format(PAGES[math.random(#PAGES)], math.random(1, 5000))
   local items = ""
   if math.random() < 0.3 then
      items = string.format('{"sku":"SKU-%05d","qty":%d,"price":%d.%02d}',
                            math.random(1, 99999), math.random(1, 3),
                            math.random(1, 300), math.random(0, 99))
   end
   return string.format(
      '{"event_id":"%s","user_id":%d,"timestamp":"%s%s","metadata":{"type":"%s",' ..
      '"page":"%s","referrer":"https://www.google.com/","device":%s,"utm":%s,' ..
      '"items":[%s],"text":"%s","session":{"seq":%d},"consent":true}}',
      event_id(), user_id(), now(), OFFSETS[math.random(#OFFSETS)],
      TYPES[math.random(#TYPES)], page, DEVICES[math.random(#DEVICES)],
      UTMS[math.random(#UTMS)], items, TEXTS[math.random(#TEXTS)], math.random(1, 200))
end

function request()
   if per_request == 1 then
      return wrk.format(nil, nil, nil, event())
   end
   local batch = {}
   for i = 1, per_request do
      batch[i] = event()
   end
   return wrk.format(nil, nil, nil, "[" .. table.concat(batch, ",") .. "]")
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local total = {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("statuses")
      for status, count in pairs(counts) do
         total[status] = (total[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(total) do
      table.insert(parts, string.format("%d=%d", status, count))
   end
   table.sort(parts)
   io.write("statuses: " .. table.concat(parts, " ") .. "\n")
end
