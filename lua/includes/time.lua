-- Server time in ms: every sidecar shares Redis's clock, so none's skew matters.
local function now_ms()
  local t = rcall("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
