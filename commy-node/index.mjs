// ESM entry point of @commy/node: the same API as the CommonJS one.
import commy from './index.js'

export const {
  Mesh,
  Service,
  Subscription,
  Publisher,
  Region,
  CommyError,
  codes,
  NativeMesh,
  NativePublisher,
  NativeRegion,
} = commy
export default commy
