-- Argo CD health check for joule.dev/TrainingJob, from the status the Joule operator writes.
-- Argo CD runs it with the object as the global `obj` (gopher-lua, Lua 5.1) and reads
-- hs.status (Healthy, Progressing, Degraded, Suspended, Unknown) and hs.message.
local hs = {}
local st = obj.status

-- "Reason: message" from status, so the Argo CD UI says why, not only what.
local function why(default)
  if st.reason ~= nil and st.reason ~= "" and st.message ~= nil and st.message ~= "" then
    return st.reason .. ": " .. st.message
  end
  if st.message ~= nil and st.message ~= "" then
    return st.message
  end
  if st.reason ~= nil and st.reason ~= "" then
    return st.reason
  end
  return default
end

if st == nil or st.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

-- A status written for an older spec says nothing about the current one (Argo CD has just
-- synced a change, or the operator is down): wait until the operator has seen it.
local generation = obj.metadata.generation
local observed = st.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    .. " (status is of generation " .. tostring(observed) .. ")"
  return hs
end

local phase = st.phase
if phase == "Running" or phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Pending" or phase == "Starting" or phase == "Resizing" then
  hs.status = "Progressing"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
  return hs
end
hs.message = why(phase)
return hs
