-- Argo CD health of a ckpt.dev/v1alpha1 CheckpointConversion, from its status conditions.
-- Written for Argo CD's default Lua sandbox: gopher-lua (Lua 5.1) with only the base and
-- table libraries, so no string.* or math.*. Tested by operator/tests/argocd.rs.
local hs = { status = "Progressing", message = "Waiting for the operator to pick it up" }

if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local function condition(type)
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function is(c, status)
  return c ~= nil and c.status == status
end

local function text(c)
  if c == nil or c.message == nil or c.message == "" then
    return c and c.reason or ""
  end
  return c.message
end

local accepted = condition("Accepted")
local running = condition("Running")
local succeeded = condition("Succeeded")
local failed = condition("Failed")
local validated = condition("Validated")

if is(failed, "True") then
  hs.status = "Degraded"
  hs.message = text(failed)
elseif is(accepted, "False") then
  -- A missing claim is waited for (the operator looks again); anything else is refused.
  if accepted.reason == "PVCNotFound" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = text(accepted)
elseif is(succeeded, "True") then
  local spec = obj.spec or {}
  local switched_off = spec.validation ~= nil and spec.validation.enabled == false
  if is(validated, "True") then
    hs.status = "Healthy"
    hs.message = text(succeeded) .. "; validated: " .. text(validated)
  elseif validated == nil and switched_off then
    -- The resource asked for no validation, so there is no verdict to wait for.
    hs.status = "Healthy"
    hs.message = text(succeeded) .. "; not validated: spec.validation.enabled is false"
  elseif validated ~= nil then
    -- False (checks failed) or Unknown (asked for, not reported).
    hs.status = "Degraded"
    hs.message = "converted, but not validated: " .. text(validated)
  else
    hs.message = text(succeeded) .. "; waiting for validation"
  end
elseif is(running, "True") then
  hs.message = text(running)
elseif accepted ~= nil then
  hs.message = text(accepted)
end
return hs
