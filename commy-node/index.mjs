// ESM entry point of @commy/node: the same API as the CommonJS one.
import commy from './index.js'

export const { Mesh, Service, Subscription, Region, CommyError, codes, NativeMesh, NativeRegion } = commy
export default commy
