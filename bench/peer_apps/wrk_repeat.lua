-- wrk script: wrk_post.lua's body and summary, but one request in ten unique: its first
-- 8 bytes from OFFSET (the third argument) carry a counter, so a response cache answers
-- the other nine from memory and this one from the engine (a 90 % repeat rate). The
-- fourth argument starts the counter, so runs against one server never repeat each
-- other's unique bodies.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "wrk_post.lua")
local post_init = init
local fixed, head, tail
local n = 0

function init(args)
  post_init(args)
  local offset = tonumber(args[3])
  n = tonumber(args[4]) or 0
  head = wrk.body:sub(1, offset)
  tail = wrk.body:sub(offset + 9)
  fixed = wrk.format()
end

function request()
  n = n + 1
  if n % 10 ~= 0 then
    return fixed
  end
  return wrk.format(nil, nil, nil, head .. string.format("%08d", n % 100000000) .. tail)
end
