'use strict'
// Roles the tests run in child processes (the runtime dir comes from
// COMMY_RUNTIME_DIR, as in any application):
//
//   serve NAME          serve NAME (reply: "<pid>:<request>") and `stop`
//                       (closes the mesh); prints `ready`; must then exit by
//                       itself once the mesh is closed
//   call NAME N         make N calls to NAME, check each reply, print a JSON
//                       summary {pids: [...distinct server pids]}
//   region-write NAME TEXT   write TEXT at offset 0 of region NAME (64 B),
//                       print `ready`, keep it open until stdin closes
//   idle                open a mesh, close it, and do nothing else
//   publish-remote      (with COMMY_LISTEN set) print `ready`; once `news`
//                       and the group topic `jobs` have subscribers, publish
//                       `0`..`199` on news and `0`..`49` on jobs, print
//                       `published`, and close when stdin closes

const { Mesh } = require('..')

async function main([role, ...args]) {
  const mesh = await Mesh.open()
  switch (role) {
    case 'serve': {
      const [name] = args
      await mesh.serve(name, async (req) => `${process.pid}:${req.toString()}`)
      await mesh.serve('stop', () => {
        // Answer first, then close: the process must exit on its own.
        setImmediate(() => mesh.close())
        return 'stopping'
      })
      console.log('ready')
      return
    }
    case 'call': {
      const [name, n] = args
      const pids = new Set()
      for (let i = 0; i < Number(n); i++) {
        const reply = (await mesh.call(name, `req-${i}`, { timeoutMs: 10_000 })).toString()
        const [pid, echoed] = reply.split(':')
        if (echoed !== `req-${i}`) throw new Error(`call ${i} got ${reply}`)
        pids.add(Number(pid))
      }
      await mesh.close()
      console.log(JSON.stringify({ pids: [...pids] }))
      return
    }
    case 'region-write': {
      const [name, text] = args
      const region = mesh.region(name, { size: 64 })
      region.write(text, 0)
      console.log('ready')
      process.stdin.resume()
      process.stdin.on('end', async () => {
        region.close()
        await mesh.close()
      })
      return
    }
    case 'publish-remote': {
      console.log('ready')
      for (const topic of ['news', 'jobs']) {
        while ((await mesh.publish(topic, 'probe')) === 0) {
          await new Promise((r) => setTimeout(r, 10))
        }
      }
      for (let i = 0; i < 200; i++) await mesh.publish('news', String(i))
      for (let i = 0; i < 50; i++) await mesh.publish('jobs', String(i))
      console.log('published')
      process.stdin.resume()
      process.stdin.on('end', () => mesh.close())
      return
    }
    case 'idle':
      await mesh.close()
      // Then nothing: the process must end by itself.
      console.log('closed')
      return
  }
  throw new Error(`unknown role ${role}`)
}

main(process.argv.slice(2)).catch((e) => {
  console.error(e)
  process.exit(1)
})
